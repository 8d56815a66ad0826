"""PyTorch reference of jina-embeddings-v4, written from shared/spec/MODEL.md on top of transformers'
Qwen2.5-VL (Jina's own modeling code cannot be downloaded here). It computes what Jina's
`encode_text` / `encode_image` compute, the same way (padded batches, SDPA attention, per-row task
LoRA, masked mean pooling, the multi-vector projector with its LoRA), once in fp32 and once as Jina
runs it (bf16 weights under bf16 autocast), and dumps intermediates for debugging.

Runs on the GPU machine (torch 2.11, transformers 5.17) or anywhere torch and transformers are installed.

    # the tiny fixtures of tests/fixtures/tiny (see tests/fixtures/README.md for the one device command)
    python3 tools/reference.py fixtures --model tests/fixtures/tiny/model \
        --images tests/fixtures/images --out OUTDIR

The checkpoint is read exactly as shipped (legacy base names, new adapter names: spec §9.1b), so the
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
    """Hooks that record what transformers computed: M-RoPE positions and the spliced embeddings."""

    def __init__(self, model):
        self.positions = None
        self.inputs_embeds = None
        lm = model.model.language_model

        def rope_hook(_module, args, kwargs):
            pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            self.positions = pos.detach().clone()

        def lm_hook(_module, args, kwargs):
            emb = kwargs.get("inputs_embeds")
            if emb is not None:
                self.inputs_embeds = emb.detach().float().clone()

        lm.rotary_emb.register_forward_pre_hook(rope_hook, with_kwargs=True)
        lm.register_forward_pre_hook(lm_hook, with_kwargs=True)


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
    from transformers import Qwen2VLImageProcessorFast

    size = {"shortest_edge": pre["min_pixels"], "longest_edge": pre["max_pixels"]}
    return Qwen2VLImageProcessorFast(
        size=size, min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], patch_size=pre["patch_size"],
        temporal_patch_size=pre["temporal_patch_size"], merge_size=pre["merge_size"],
        image_mean=pre["image_mean"], image_std=pre["image_std"],
    )


def slow_image_processor(pre):
    try:
        from transformers import Qwen2VLImageProcessor
    except ImportError:
        return None
    size = {"shortest_edge": pre["min_pixels"], "longest_edge": pre["max_pixels"]}
    try:
        return Qwen2VLImageProcessor(
            size=size, min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], patch_size=pre["patch_size"],
            temporal_patch_size=pre["temporal_patch_size"], merge_size=pre["merge_size"],
            image_mean=pre["image_mean"], image_std=pre["image_std"],
        )
    except Exception as e:  # noqa: BLE001 - a missing slow processor is not fatal
        print("slow processor unavailable:", e)
        return None


def tiny_image_ids(cfg, n_tokens):
    """The image template of spec §4.2 with the tiny model's special ids; the plain words are mapped
    into the tiny vocabulary (the real ids 872, 198, 74785, 279, 2168, 13 taken modulo 2000)."""
    im_start = cfg["bos_token_id"] + 1
    im_end = cfg["eos_token_id"]
    words = [x % 2000 for x in [74785, 279, 2168, 13]]
    return (
        [im_start, 872 % 2000, 198, cfg["vision_start_token_id"]]
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

    fast, slow = image_processor(pre), slow_image_processor(pre)
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
        out_t[f"image/{name}/pixel_values"] = pv
        out_t[f"image/{name}/rgb"] = torch.from_numpy(__import__("numpy").asarray(pil).copy())
        if slow is not None and "max_pixels" not in im:
            try:
                senc = slow(images=[pil], return_tensors="pt")
                out_t[f"image/{name}/pixel_values_slow"] = torch.as_tensor(senc["pixel_values"]).float()
            except Exception as e:  # noqa: BLE001
                print("slow processor failed:", e)
        n_tokens = int(thw.prod().item()) // (merge * merge)
        ids = tiny_image_ids(cfg, n_tokens)
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
                    out_t[f"text/{i}/hidden/{mode}"] = torch.stack([x[0] for x in hidden]).float().cpu()
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
                if mode == "fp32":
                    out_t[f"image/{name}/positions"] = cap.positions[:, 0, :].cpu().to(torch.int32)
                    visual = model.model.visual
                    try:
                        widx, cuw = visual.get_window_index(thw.to(device))
                        out_t[f"image/{name}/window_index"] = torch.as_tensor(widx).cpu().to(torch.int32)
                        out_t[f"image/{name}/cu_window_seqlens"] = torch.unique_consecutive(torch.as_tensor(cuw)).to(torch.int32)
                    except Exception as e:  # noqa: BLE001 - a renamed helper should not stop the run
                        print("get_window_index unavailable:", e)
                    try:
                        out_t[f"image/{name}/rot_pos_emb"] = visual.rot_pos_emb(thw.to(device)).float().cpu()
                    except Exception as e:  # noqa: BLE001
                        print("rot_pos_emb unavailable:", e)
                if hidden is not None:
                    out_t[f"image/{name}/hidden/{mode}"] = torch.stack([x[0] for x in hidden]).float().cpu()
        del model, projector
        torch.cuda.empty_cache() if device == "cuda" else None

    # Sanity: the image positions must follow spec §7.3 (h and w vary over the image block).
    for name, pv, thw, entry in images:
        if entry["embed"]:
            pos = out_t[f"image/{name}/positions"]
            rows = [r for r, x in enumerate(entry["ids"]) if x == cfg["image_token_id"]]
            if pos[1, rows].unique().numel() < 2 and thw[0, 1] > 2 * merge:
                sys.exit(f"{name}: image tokens got 1-D positions: the reference is wrong (mm_token_type_ids?)")

    out_t = {k: v.contiguous() for k, v in out_t.items()}
    meta["tensors"] = {k: list(v.shape) for k, v in out_t.items()}
    os.makedirs(args.out, exist_ok=True)
    save_file(out_t, os.path.join(args.out, "reference.safetensors"))
    json.dump(meta, open(os.path.join(args.out, "reference.json"), "w"), indent=1)
    # The fp32 run against the bf16 run: how far apart the two references are.
    report = []
    for k in sorted(out_t):
        if k.endswith("/fp32") and "/single/" in k:
            a, b = out_t[k], out_t[k[:-4] + "bf16"]
            report.append(f"{k[:-5]:<32} fp32 vs bf16 cos {F.cosine_similarity(a, b, dim=0).item():.6f}")
    print("\n".join(report))
    print(f"wrote {len(out_t)} tensors to {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixtures", help="reference outputs and dumps for the tiny fixture model")
    f.add_argument("--model", required=True)
    f.add_argument("--images", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    if args.cmd == "fixtures":
        fixtures(args)
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
